"""Put this directory first on PYTHONPATH, with NAIAD_SAMPLE=OUT, to profile the processes a
benchmark starts (bench/sampler.py, `install_from_env`)."""

from bench.sampler import install_from_env

install_from_env()
