-- Envelope encryption: each object's data key, wrapped by a master key (KEK), lives only here.
-- Clearing a column destroys that object's key (crypto-shredding).
ALTER TABLE jobs ADD COLUMN document_kek TEXT;
ALTER TABLE jobs ADD COLUMN document_dek BLOB;
ALTER TABLE jobs ADD COLUMN result_kek TEXT;
ALTER TABLE jobs ADD COLUMN result_dek BLOB;
