"""Decoding-time alignment: robust multi-objective decoding (RMOD) and related decoders."""
