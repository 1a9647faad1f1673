"""Streamlit-side helpers of the dashboard: URL parameters, caching, widgets, figures.

`params` (URL keys and defaults), `cache` (the only module that caches), `widgets`
(streamlit widget builders), `figures` / `tables` / `render` (pure: no streamlit import).
"""
