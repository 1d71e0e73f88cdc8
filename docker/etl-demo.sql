-- Seed data for the ETL demo in docker/compose.yml (README: "Docker"): 1,000 orders
-- the postgres-extractor reads by its `id` cursor.
CREATE TABLE orders (
    id       BIGSERIAL PRIMARY KEY,
    customer TEXT NOT NULL,
    amount   NUMERIC(10, 2) NOT NULL,
    created  TIMESTAMP NOT NULL
);
INSERT INTO orders (customer, amount, created)
SELECT 'customer-' || (n % 37), round((n * 7.31)::numeric % 500, 2),
       TIMESTAMP '2024-01-01' + n * INTERVAL '1 minute'
FROM generate_series(1, 1000) AS n;
