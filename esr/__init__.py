"""esr, the Enhanced Session Recorder."""

__version__ = "0.1.0"
