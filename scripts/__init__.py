"""Repository tooling shared by the generators (alerts/, dashboards/); not part of the installed package."""
