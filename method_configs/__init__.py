"""nerfstudio method specifications of mmstyle_ns (installed as ``mmstyle_ns.method_configs``)."""
