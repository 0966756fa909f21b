"""JSON Schemas of the attnformat spec, shipped as package data (this folder is spec/schemas)."""
