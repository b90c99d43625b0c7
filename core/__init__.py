"""The base layer: what every stage shares (storage, ...). Imports nothing else of LinearSR."""
