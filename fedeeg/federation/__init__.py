"""Everything that touches Flower (ServerApp, ClientApp, simulation engine).

Data, models, training and aggregation live outside this package and are
testable without Flower.
"""
