"""ComfyUI-compatible HTTP and WebSocket API (routes, wire shapes, serving logic)."""
