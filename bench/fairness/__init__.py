"""`infergate bench fairness`: tenants contending for one pod, with and without the picker's
flow control (VTC fairness, priorities)."""
