"""The local fleet: the gateway (the local load balancer), the worker-process
provider and the runtime that runs both on one machine."""
