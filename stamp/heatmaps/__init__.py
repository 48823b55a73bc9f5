"""``stamp heatmaps``: tile relevance and attention maps, overlays, top/bottom tiles and GeoJSON."""
