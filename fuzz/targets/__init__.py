"""Fuzz targets, one module each: ``fuzz_one(data: bytes) -> None`` and ``SEEDS: list[bytes]``."""
