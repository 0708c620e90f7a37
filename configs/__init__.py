"""The configs shipped with mlm, installed as `mlm.configs` (pyproject.toml maps it here).

Each `NAME.py` defines `get_config()`. `--config NAME`, `--config NAME.py` and
`--config configs/NAME.py` load it from any directory once mlm is installed;
`mlm.config_file.packaged_config_path(NAME)` gives its path.
"""
