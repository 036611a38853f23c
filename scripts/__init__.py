"""Python components of the DHR bundle, referenced from `configs/*.yaml` as `scripts.<module>.<Name>`."""
