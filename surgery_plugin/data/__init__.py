"""Behavior data: loaders (local files first, the public hub copies as a fallback), the probe data sets by
name, the split table (which indices each step uses) and the data folder."""
