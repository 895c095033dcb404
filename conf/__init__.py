"""atx's Hydra configs. They ship inside the package as ``atx.conf`` (pyproject.toml maps this
folder there), and ``atx-train`` reads them as ``pkg://atx.conf``."""
