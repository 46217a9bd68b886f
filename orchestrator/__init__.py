"""rime's driver side: the CLI, configs and stage loops."""
