"""The ecosystems this package plugs into: EasyEdit (``easyedit/``) and lm-eval (``lm_eval/``)."""
