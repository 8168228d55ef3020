"""sre2l_ray: SRe2L dataset condensation (Squeeze, Recover, Relabel) on Ray."""

__version__ = "0.1.0"
