"""cxflax: JAX/Flax reimplementations of COVID-19 chest CT and chest X-ray deep-learning methods."""

__version__ = "0.1.0"
