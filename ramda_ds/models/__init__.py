from .transformer_xl import TransfoXLConfig, TransfoXLLM

__all__ = ["TransfoXLConfig", "TransfoXLLM"]
