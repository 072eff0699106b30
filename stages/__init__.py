"""The pipeline stages: one module per stage, each a config dataclass and ``run(cfg)``.

``scripts/NN_name.py`` parses flags into the config and calls ``run``
(:func:`data_process.cli.main`); tests and sweeps call ``run`` directly.  This is the
only layer that knows run directories and how stages feed each other.
"""
