"""modelguard: a control plane that protects ML model APIs from extraction, through Envoy."""

__version__ = "0.1.0"
