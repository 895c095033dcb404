"""atx: attention transfer (Zagoruyko & Komodakis, ICLR 2017) and its baselines."""

__version__ = "0.1.0"
