"""The test suite as one package (tests.ops, tests.modules, ...), so helpers import as ``tests.numerics`` etc."""
