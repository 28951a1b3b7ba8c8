"""``inteprelens.core.sites``."""

from fastgim.sites import ALL_SITES, GLOBAL_SITES, LAYER_SITES, SITE_SPECS, SiteName, SiteSpec

__all__ = ["ALL_SITES", "GLOBAL_SITES", "LAYER_SITES", "SITE_SPECS", "SiteName", "SiteSpec"]
