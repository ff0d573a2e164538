"""Generated from protos/ by scripts/gen_proto.sh; never edit by hand."""
