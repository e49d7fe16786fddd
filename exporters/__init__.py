"""Exporters: turn a federated run into a model for serving."""
