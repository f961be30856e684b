"""One test per attack and fault the two promises must survive (issue 12); see docs/security.md."""
