//! A Checkout Session's `line_items[N][...]` in payment mode: `price_data` with `currency`,
//! `unit_amount` and `product_data[name]`, and `quantity`, with Stripe's errors for each way one
//! can be wrong. Price ids (`line_items[N][price]`) name Price objects, which the fake does not
//! have yet, so they are "No such price".

use crate::error::{shorten, ApiError};
use crate::params::Reader;

use pgpay_core::checkout::MAX_AMOUNT;

/// Stripe's limit for payment mode.
pub const MAX_LINE_ITEMS: usize = 100;
/// Product names, as Stripe limits them.
const MAX_NAME_CHARS: usize = 250;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub name: String,
    pub description: Option<String>,
    pub currency: String,
    pub unit_amount: i64,
    pub quantity: i64,
}

impl LineItem {
    pub fn amount(&self) -> Option<i64> {
        self.unit_amount.checked_mul(self.quantity)
    }
}

/// Reads and checks every line item: at least one, one currency, a total of 1..=99999999.
/// Returns the items, their currency and the total.
pub fn read(r: &mut Reader) -> Result<(Vec<LineItem>, String, i64), ApiError> {
    let readers = r.hash_list("line_items")?;
    if readers.is_empty() {
        return Err(ApiError::missing_param("line_items"));
    }
    if readers.len() > MAX_LINE_ITEMS {
        return Err(ApiError::invalid_param(
            "line_items",
            format!(
                "You may only specify up to {MAX_LINE_ITEMS} line items in payment mode, but you passed in {}.",
                readers.len()
            ),
        ));
    }
    let mut items = Vec::with_capacity(readers.len());
    for reader in readers {
        items.push(read_one(reader)?);
    }
    let currency = items[0].currency.clone();
    let mut total: i64 = 0;
    for (i, item) in items.iter().enumerate() {
        if item.currency != currency {
            return Err(ApiError::invalid_param(
                format!("line_items[{i}][price_data][currency]"),
                format!(
                    "All line items must have the same currency: line_items[0] is in {currency}, line_items[{i}] in {}.",
                    item.currency
                ),
            ));
        }
        total = item
            .amount()
            .and_then(|amount| total.checked_add(amount))
            .filter(|t| *t <= MAX_AMOUNT)
            .ok_or_else(too_large)?;
    }
    if total < 1 {
        // Stripe's own floor is the currency's minimum charge (50 cents for usd); the fake, as for
        // PaymentIntents, only refuses nothing at all.
        return Err(ApiError::invalid_param(
            "line_items",
            "The Checkout Session's total amount due must be greater than 0 in payment mode.",
        ));
    }
    Ok((items, currency, total))
}

fn read_one(mut item: Reader) -> Result<LineItem, ApiError> {
    let price = item.string("price")?;
    let price_data = item.hash("price_data")?;
    let quantity = item.integer("quantity")?;
    item.ignore(&["adjustable_quantity", "dynamic_tax_rates", "tax_rates"]);
    let quantity_path = item.path("quantity");
    let price_path = item.path("price");
    let price_data_path = item.path("price_data");
    item.finish()?;
    let mut price_data = match (price, price_data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                price_path,
                "You may only specify one of these parameters: price, price_data.",
            ))
        }
        (Some(price), None) => {
            return Err(ApiError::invalid_param(
                price_path,
                format!("No such price: '{}'", shorten(&price)),
            )
            .with_code("resource_missing"))
        }
        (None, None) => {
            return Err(ApiError::invalid_param(
                price_data_path,
                "You must specify either `price` or `price_data` for each line item.",
            ))
        }
        (None, Some(price_data)) => price_data,
    };
    let quantity = match quantity {
        None => return Err(ApiError::missing_param(&quantity_path)),
        Some(q) if q < 1 => {
            return Err(ApiError::invalid_param(
                quantity_path,
                "This value must be greater than or equal to 1.",
            )
            .with_code("parameter_invalid_integer"))
        }
        Some(q) => q,
    };

    let currency_path = price_data.path("currency");
    let currency = price_data
        .string("currency")?
        .ok_or_else(|| ApiError::missing_param(&currency_path))?;
    let currency = pgpay_core::checkout::normalize_currency(&currency).map_err(|_| {
        ApiError::invalid_param(
            &currency_path,
            format!(
                "Invalid currency: {}. Stripe currently supports three-letter ISO currency codes in lowercase, such as usd.",
                shorten(&currency)
            ),
        )
    })?;
    let unit_amount_path = price_data.path("unit_amount");
    let unit_amount = price_data.integer("unit_amount")?;
    let product = price_data.string("product")?;
    let product_data = price_data.hash("product_data")?;
    let recurring = price_data.hash("recurring")?;
    let decimal = price_data.string("unit_amount_decimal")?;
    let product_path = price_data.path("product");
    let product_data_path = price_data.path("product_data");
    price_data.ignore(&["tax_behavior"]);
    price_data.finish()?;
    if recurring.is_some() {
        return Err(ApiError::invalid_param(
            price_data_path,
            "You specified `payment` mode but passed a recurring price. Either switch to `subscription` mode or use only one-time prices.",
        ));
    }
    if decimal.is_some() {
        return Err(ApiError::invalid_param(
            price_data_path,
            "stripe-fake supports unit_amount only, not unit_amount_decimal.",
        ));
    }
    let unit_amount = match unit_amount {
        None => return Err(ApiError::missing_param(&unit_amount_path)),
        Some(a) if a < 0 => {
            return Err(ApiError::invalid_param(
                unit_amount_path,
                "This value must be greater than or equal to 0.",
            )
            .with_code("parameter_invalid_integer"))
        }
        Some(a) if a > MAX_AMOUNT => return Err(too_large().with_param(unit_amount_path)),
        Some(a) => a,
    };
    let (name, description) = match (product, product_data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                product_path,
                "You may only specify one of these parameters: product, product_data.",
            ))
        }
        (Some(product), None) => {
            return Err(ApiError::invalid_param(
                product_path,
                format!("No such product: '{}'", shorten(&product)),
            )
            .with_code("resource_missing"))
        }
        (None, None) => return Err(ApiError::missing_param(&product_data_path)),
        (None, Some(mut product_data)) => {
            let name = product_data
                .bounded_string("name", MAX_NAME_CHARS)?
                .ok_or_else(|| ApiError::missing_param(&product_data.path("name")))?;
            let description = product_data.bounded_string("description", 40_000)?;
            // Product metadata and images belong to the Product, which the fake does not keep.
            product_data.metadata()?;
            product_data.ignore(&["images", "tax_code"]);
            product_data.finish()?;
            (name, description)
        }
    };
    Ok(LineItem {
        name,
        description,
        currency,
        unit_amount,
        quantity,
    })
}

fn too_large() -> ApiError {
    ApiError::invalid_param(
        "line_items",
        format!("The Checkout Session's total amount must be no more than {MAX_AMOUNT} in the currency's smallest unit."),
    )
    .with_code("amount_too_large")
}
