"""Routing: send each request to the cheapest model that can handle it (data, features, routers, metrics)."""
