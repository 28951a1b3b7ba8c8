"""Generated factual data for the default model: countries, sentence templates, held-out prompts.

Every country has four relations (capital, language, currency, continent) and every relation has
five sentence templates whose answer comes last (``"The capital of {s} is {a}."``). The training
corpus of ``scripts/train_default_model.py`` uses every (country, relation, template) combination
except the held-out ones: each country holds out exactly one (relation, template) pair, chosen by a
fixed rule (:func:`is_held_out`), so the fact itself is still trained through the other four
templates of that relation. ``("France", "capital", template 0)`` -- ``"The capital of France is"``
-- is held out.

Prompts are plain text without a trailing space; answers carry the leading space the byte-level
tokenizer puts on words (``" Paris"``). All country, capital, language and currency names are
single words (the training script asserts that they are single tokens); two continents are two
words (``" North America"``), whose first token decides a prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RELATIONS: tuple[str, ...] = ("capital", "language", "currency", "continent")

# Answers are the part after "{a}"; "{s}" is the subject (the country). The answer is always last.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {s} is {a}.",
        "{s}'s capital city is {a}.",
        "The capital city of {s} is {a}.",
        "{s} has its capital in {a}.",
        "The seat of government of {s} is in {a}.",
    ),
    "language": (
        "The official language of {s} is {a}.",
        "In {s}, most people speak {a}.",
        "The main language spoken in {s} is {a}.",
        "{s}'s official language is {a}.",
        "Most people in {s} speak {a}.",
    ),
    "currency": (
        "The currency of {s} is the {a}.",
        "In {s}, people pay with the {a}.",
        "The official currency of {s} is the {a}.",
        "{s}'s currency is the {a}.",
        "The money used in {s} is the {a}.",
    ),
    "continent": (
        "{s} is a country in {a}.",
        "{s} is located in {a}.",
        "The country of {s} lies in {a}.",
        "{s} is part of {a}.",
        "You can find {s} in {a}.",
    ),
}


@dataclass(frozen=True)
class Country:
    """One country and its four facts (all single words except two-word continents)."""

    name: str
    capital: str
    language: str
    currency: str
    continent: str

    def answer(self, relation: str) -> str:
        """The fact for ``relation`` (one of :data:`RELATIONS`), without leading space."""
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        return getattr(self, relation)


def _c(name: str, capital: str, language: str, currency: str, continent: str) -> Country:
    return Country(name, capital, language, currency, continent)


_EU, _AS, _AF, _NA, _SA, _OC = "Europe", "Asia", "Africa", "North America", "South America", "Oceania"

# France is first on purpose: index 0 holds out ("capital", template 0).
COUNTRIES: tuple[Country, ...] = (
    _c("France", "Paris", "French", "euro", _EU),
    _c("Germany", "Berlin", "German", "euro", _EU),
    _c("Italy", "Rome", "Italian", "euro", _EU),
    _c("Spain", "Madrid", "Spanish", "euro", _EU),
    _c("Portugal", "Lisbon", "Portuguese", "euro", _EU),
    _c("Greece", "Athens", "Greek", "euro", _EU),
    _c("Netherlands", "Amsterdam", "Dutch", "euro", _EU),
    _c("Austria", "Vienna", "German", "euro", _EU),
    _c("Poland", "Warsaw", "Polish", "zloty", _EU),
    _c("Sweden", "Stockholm", "Swedish", "krona", _EU),
    _c("Norway", "Oslo", "Norwegian", "krone", _EU),
    _c("Denmark", "Copenhagen", "Danish", "krone", _EU),
    _c("Finland", "Helsinki", "Finnish", "euro", _EU),
    _c("Iceland", "Reykjavik", "Icelandic", "krona", _EU),
    _c("Hungary", "Budapest", "Hungarian", "forint", _EU),
    _c("Romania", "Bucharest", "Romanian", "leu", _EU),
    _c("Bulgaria", "Sofia", "Bulgarian", "euro", _EU),
    _c("Croatia", "Zagreb", "Croatian", "euro", _EU),
    _c("Serbia", "Belgrade", "Serbian", "dinar", _EU),
    _c("Ukraine", "Kyiv", "Ukrainian", "hryvnia", _EU),
    _c("Russia", "Moscow", "Russian", "ruble", _EU),
    _c("Czechia", "Prague", "Czech", "koruna", _EU),
    _c("Slovakia", "Bratislava", "Slovak", "euro", _EU),
    _c("Slovenia", "Ljubljana", "Slovenian", "euro", _EU),
    _c("Estonia", "Tallinn", "Estonian", "euro", _EU),
    _c("Latvia", "Riga", "Latvian", "euro", _EU),
    _c("Lithuania", "Vilnius", "Lithuanian", "euro", _EU),
    _c("Albania", "Tirana", "Albanian", "lek", _EU),
    _c("Belarus", "Minsk", "Belarusian", "ruble", _EU),
    _c("Moldova", "Chisinau", "Romanian", "leu", _EU),
    _c("Britain", "London", "English", "pound", _EU),
    _c("Malta", "Valletta", "Maltese", "euro", _EU),
    _c("Cyprus", "Nicosia", "Greek", "euro", _EU),
    _c("Montenegro", "Podgorica", "Montenegrin", "euro", _EU),
    _c("Liechtenstein", "Vaduz", "German", "franc", _EU),
    _c("Japan", "Tokyo", "Japanese", "yen", _AS),
    _c("China", "Beijing", "Chinese", "yuan", _AS),
    _c("Korea", "Seoul", "Korean", "won", _AS),
    _c("Thailand", "Bangkok", "Thai", "baht", _AS),
    _c("Vietnam", "Hanoi", "Vietnamese", "dong", _AS),
    _c("Indonesia", "Jakarta", "Indonesian", "rupiah", _AS),
    _c("Philippines", "Manila", "Filipino", "peso", _AS),
    _c("Pakistan", "Islamabad", "Urdu", "rupee", _AS),
    _c("Bangladesh", "Dhaka", "Bengali", "taka", _AS),
    _c("Nepal", "Kathmandu", "Nepali", "rupee", _AS),
    _c("Iran", "Tehran", "Persian", "rial", _AS),
    _c("Iraq", "Baghdad", "Arabic", "dinar", _AS),
    _c("Jordan", "Amman", "Arabic", "dinar", _AS),
    _c("Syria", "Damascus", "Arabic", "pound", _AS),
    _c("Lebanon", "Beirut", "Arabic", "pound", _AS),
    _c("Turkey", "Ankara", "Turkish", "lira", _AS),
    _c("Afghanistan", "Kabul", "Pashto", "afghani", _AS),
    _c("Kazakhstan", "Astana", "Kazakh", "tenge", _AS),
    _c("Uzbekistan", "Tashkent", "Uzbek", "som", _AS),
    _c("Kyrgyzstan", "Bishkek", "Kyrgyz", "som", _AS),
    _c("Tajikistan", "Dushanbe", "Tajik", "somoni", _AS),
    _c("Turkmenistan", "Ashgabat", "Turkmen", "manat", _AS),
    _c("Azerbaijan", "Baku", "Azerbaijani", "manat", _AS),
    _c("Armenia", "Yerevan", "Armenian", "dram", _AS),
    _c("Mongolia", "Ulaanbaatar", "Mongolian", "tugrik", _AS),
    _c("Myanmar", "Naypyidaw", "Burmese", "kyat", _AS),
    _c("Laos", "Vientiane", "Lao", "kip", _AS),
    _c("Qatar", "Doha", "Arabic", "riyal", _AS),
    _c("Oman", "Muscat", "Arabic", "rial", _AS),
    _c("Yemen", "Sanaa", "Arabic", "rial", _AS),
    _c("Bahrain", "Manama", "Arabic", "dinar", _AS),
    _c("Bhutan", "Thimphu", "Dzongkha", "ngultrum", _AS),
    _c("Maldives", "Male", "Dhivehi", "rufiyaa", _AS),
    _c("Egypt", "Cairo", "Arabic", "pound", _AF),
    _c("Nigeria", "Abuja", "English", "naira", _AF),
    _c("Kenya", "Nairobi", "Swahili", "shilling", _AF),
    _c("Ghana", "Accra", "English", "cedi", _AF),
    _c("Morocco", "Rabat", "Arabic", "dirham", _AF),
    _c("Algeria", "Algiers", "Arabic", "dinar", _AF),
    _c("Tunisia", "Tunis", "Arabic", "dinar", _AF),
    _c("Libya", "Tripoli", "Arabic", "dinar", _AF),
    _c("Sudan", "Khartoum", "Arabic", "pound", _AF),
    _c("Senegal", "Dakar", "French", "franc", _AF),
    _c("Uganda", "Kampala", "English", "shilling", _AF),
    _c("Tanzania", "Dodoma", "Swahili", "shilling", _AF),
    _c("Rwanda", "Kigali", "Kinyarwanda", "franc", _AF),
    _c("Zambia", "Lusaka", "English", "kwacha", _AF),
    _c("Angola", "Luanda", "Portuguese", "kwanza", _AF),
    _c("Mozambique", "Maputo", "Portuguese", "metical", _AF),
    _c("Botswana", "Gaborone", "English", "pula", _AF),
    _c("Namibia", "Windhoek", "English", "dollar", _AF),
    _c("Madagascar", "Antananarivo", "Malagasy", "ariary", _AF),
    _c("Cameroon", "Yaounde", "French", "franc", _AF),
    _c("Somalia", "Mogadishu", "Somali", "shilling", _AF),
    _c("Malawi", "Lilongwe", "English", "kwacha", _AF),
    _c("Gabon", "Libreville", "French", "franc", _AF),
    _c("Liberia", "Monrovia", "English", "dollar", _AF),
    _c("Guinea", "Conakry", "French", "franc", _AF),
    _c("Togo", "Lome", "French", "franc", _AF),
    _c("Burundi", "Gitega", "Kirundi", "franc", _AF),
    _c("Eritrea", "Asmara", "Tigrinya", "nakfa", _AF),
    _c("Mauritania", "Nouakchott", "Arabic", "ouguiya", _AF),
    _c("Canada", "Ottawa", "English", "dollar", _NA),
    _c("Cuba", "Havana", "Spanish", "peso", _NA),
    _c("Jamaica", "Kingston", "English", "dollar", _NA),
    _c("Honduras", "Tegucigalpa", "Spanish", "lempira", _NA),
    _c("Nicaragua", "Managua", "Spanish", "cordoba", _NA),
    _c("Belize", "Belmopan", "English", "dollar", _NA),
    _c("Bahamas", "Nassau", "English", "dollar", _NA),
    _c("Barbados", "Bridgetown", "English", "dollar", _NA),
    _c("Brazil", "Brasilia", "Portuguese", "real", _SA),
    _c("Chile", "Santiago", "Spanish", "peso", _SA),
    _c("Peru", "Lima", "Spanish", "sol", _SA),
    _c("Colombia", "Bogota", "Spanish", "peso", _SA),
    _c("Venezuela", "Caracas", "Spanish", "bolivar", _SA),
    _c("Ecuador", "Quito", "Spanish", "dollar", _SA),
    _c("Paraguay", "Asuncion", "Spanish", "guarani", _SA),
    _c("Uruguay", "Montevideo", "Spanish", "peso", _SA),
    _c("Guyana", "Georgetown", "English", "dollar", _SA),
    _c("Suriname", "Paramaribo", "Dutch", "dollar", _SA),
    _c("Australia", "Canberra", "English", "dollar", _OC),
    _c("Fiji", "Suva", "English", "dollar", _OC),
    _c("Samoa", "Apia", "Samoan", "tala", _OC),
    _c("Kiribati", "Tarawa", "English", "dollar", _OC),
)


@dataclass(frozen=True)
class FactPrompt:
    """A fact as a prompt and its answer.

    ``prompt`` is the sentence up to the answer, without trailing space (``"The capital of France
    is"``); ``answer`` has its leading space (``" Paris"``); ``subject`` is the country name as it
    appears in the prompt; ``sentence`` is the full training sentence.
    """

    prompt: str
    answer: str
    subject: str
    relation: str
    template_index: int
    held_out: bool

    @property
    def sentence(self) -> str:
        """The complete sentence ``prompt + answer + "."``."""
        return f"{self.prompt}{self.answer}."


def is_held_out(country_index: int, relation: str, template_index: int) -> bool:
    """Whether (country, relation, template) is held out of training.

    Country ``i`` holds out relation ``RELATIONS[i % 4]`` with template ``(i // 4) % 5``, so every
    country has exactly one held-out prompt and every relation/template gets a share of them.
    """
    held_relation = RELATIONS[country_index % len(RELATIONS)]
    held_template = (country_index // len(RELATIONS)) % len(TEMPLATES[held_relation])
    return relation == held_relation and template_index == held_template


def _make_prompt(country_index: int, relation: str, template_index: int) -> FactPrompt:
    country = COUNTRIES[country_index]
    template = TEMPLATES[relation][template_index]
    prompt = template[: template.index(" {a}")].format(s=country.name)
    return FactPrompt(
        prompt=prompt,
        answer=" " + country.answer(relation),
        subject=country.name,
        relation=relation,
        template_index=template_index,
        held_out=is_held_out(country_index, relation, template_index),
    )


def fact_prompts(split: Literal["train", "heldout", "all"] = "all") -> list[FactPrompt]:
    """All fact prompts of a split, in a fixed order (country, relation, template).

    ``"train"``: the combinations the default model is trained on; ``"heldout"``: one per
    country, never seen in training (the fact itself is trained via other templates).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'heldout' or 'all'")
    prompts = [
        _make_prompt(i, relation, t)
        for i in range(len(COUNTRIES))
        for relation in RELATIONS
        for t in range(len(TEMPLATES[relation]))
    ]
    if split == "train":
        return [p for p in prompts if not p.held_out]
    if split == "heldout":
        return [p for p in prompts if p.held_out]
    return prompts


def held_out_prompts() -> list[FactPrompt]:
    """The held-out fact prompts (one per country); shorthand for ``fact_prompts("heldout")``."""
    return fact_prompts("heldout")


def training_sentences() -> list[str]:
    """The fact sentences of the training corpus (every non-held-out combination), fixed order."""
    return [p.sentence for p in fact_prompts("train")]


def vocabulary_words() -> list[str]:
    """Every single-word name that must be one token: countries, capitals, languages, currencies."""
    words = {c.name for c in COUNTRIES}
    for country in COUNTRIES:
        words.update((country.capital, country.language, country.currency))
    return sorted(words)
