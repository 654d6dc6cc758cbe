"""Launch support: config -> DeepSpeed runner command, scheduler environment mapping."""
