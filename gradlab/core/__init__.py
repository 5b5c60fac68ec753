"""The floor every other part of gradlab stands on: the user-error type, registries, typed
plug-in options, config files, devices, torch.distributed set-up and the model-state context.
Nothing here imports another gradlab package."""
