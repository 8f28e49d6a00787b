"""Stage kinds of your own (`kind: my_kinds.<module>` in pipelines.yaml)."""
