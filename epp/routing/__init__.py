"""Model routing: ModelRoutes match a request's model (or LoRA adapter), headers and path to
weighted ModelServers, which select pods of the pool and say what the engine calls the model."""
