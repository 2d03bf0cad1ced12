"""cxrnn: chest X-ray diagnosis (COVID-19 / pneumonia / normal) with a CNN->RNN transfer-learning network."""

__version__ = "0.1.0"
