"""flexemr: serve DLRM models from disaggregated embedding servers."""
