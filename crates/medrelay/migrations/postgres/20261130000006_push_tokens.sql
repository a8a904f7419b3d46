-- Push notifications (issue #15): the FCM registration token an upload carried, sealed under a
-- data key of its own (wrapped by a master key, like the document's), kept only with its job.
-- It is taken (cleared) by the one instance that sends the job's push, and cleared with the
-- job's other keys when it is deleted, expires or is purged. No device registry: nothing about
-- a device outlives its job.
ALTER TABLE jobs ADD COLUMN push_token BYTEA;
ALTER TABLE jobs ADD COLUMN push_kek TEXT;
ALTER TABLE jobs ADD COLUMN push_dek BYTEA;
