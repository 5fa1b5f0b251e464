"""Engine integrations: each folder adapts kvcached's core to one engine, and only there is the engine imported."""
