"""ehr-alerts HTTP edge and command line."""
