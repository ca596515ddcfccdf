"""The built-in plugins of acadlm-plugins.

Our own features are ordinary pluggy plugins, registered by
:func:`acadlm_plugins.plugin_manager.build_plugin_manager` from
:data:`acadlm_plugins.plugin_manager.BUILTIN_PLUGINS` exactly as third-party plugins are, so
the training loop only knows hooks:

- :mod:`acadlm_plugins.plugins.nonfinite_loss_guard` stops a run at the first NaN/inf loss.
- :mod:`acadlm_plugins.plugins.dynamic_batch_loading` reweights a domain mixture from
  validation losses (Sheared-LLaMA's dynamic batch loading).
"""
