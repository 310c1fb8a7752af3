"""Data: the phantom generator (embedded default data), loading, datalists and converters."""
