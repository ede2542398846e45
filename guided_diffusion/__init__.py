"""ADM diffusion models: a faithful, modern port of OpenAI's guided-diffusion and improved-diffusion."""

__version__ = "0.1.0"
