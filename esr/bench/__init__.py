"""`esr bench`: event throughput and overhead, side by side with the C
floor and the bcc peer."""
