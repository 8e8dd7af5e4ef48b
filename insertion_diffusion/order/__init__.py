"""Learnable order dynamics: per-token Kumaraswamy clocks, their regularisers, the order network."""

from insertion_diffusion.order.kumaraswamy import KumaraswamyClock, schedule_regularizers
from insertion_diffusion.order.network import BoundedRate, OrderNetwork

__all__ = ["BoundedRate", "KumaraswamyClock", "OrderNetwork", "schedule_regularizers"]
