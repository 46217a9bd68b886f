"""rime's data package: procedural multimodal scenes (and, next, records, pipelines and metrics)."""
