"""The recipes, one module per paper: `--config=configs/NAME.py[:ARGS]` (ml_collections'
config_flags) calls NAME.get_config(ARGS). Recipes import each other and `configs.common` as
ordinary modules."""
