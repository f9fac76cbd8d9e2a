"""The laboratory: measurements, records and the report behind the reference (README: "The lab")."""
