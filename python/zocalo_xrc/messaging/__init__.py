"""Transports: what the Zocalo faces need from a broker, on RabbitMQ or in
this process, and where the broker is (zocalo YAML configuration, URLs)."""

from .base import (
    ConnectionLostError,
    Delivery,
    Outgoing,
    PublishRefusedError,
    QueueInUseError,
    QueueSpec,
    Subscription,
    Transport,
    TransportError,
    UnroutableError,
)
from .config import ConfigurationError, ConnectionSettings, Secret, default_environment
from .inprocess import InProcessBroker, InProcessTransport, embedded_broker

__all__ = [
    "ConfigurationError",
    "ConnectionLostError",
    "ConnectionSettings",
    "Delivery",
    "InProcessBroker",
    "InProcessTransport",
    "Outgoing",
    "PublishRefusedError",
    "QueueInUseError",
    "QueueSpec",
    "Secret",
    "Subscription",
    "Transport",
    "TransportError",
    "UnroutableError",
    "default_environment",
    "embedded_broker",
]
