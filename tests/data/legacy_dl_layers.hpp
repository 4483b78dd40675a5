// Minimal declarations of the legacy ESP-DL C++ API (release v2.0, include/typedef/dl_constant.hpp,
// include/dl_define.hpp, include/typedef/dl_variable.hpp, include/layer/dl_layer_*.hpp) that code written by
// espquant's legacy exporter (espquant.export.cpp) uses. Declarations only, with the v2.0 constructor, build()
// and call() signatures, so `g++ -fsyntax-only` checks the generated files without the real library; the tests
// point each real header name ("dl_constant.hpp", "dl_layer_conv2d.hpp", ...) at this file.
//
// One deliberate difference: layers cannot be copied here. The real classes own their output tensor through a
// raw pointer, so generated code that copied a layer would free it twice; deleting the copy makes that an error.
#pragma once

#include <climits>
#include <stddef.h>
#include <stdint.h>
#include <vector>

#define CONFIG_DEFAULT_ASSIGN_CORE \
    {                              \
    }

namespace dl
{
    typedef enum
    {
        Linear,
        ReLU,
        LeakyReLU,
        PReLU,
    } activation_type_t;

    typedef enum
    {
        PADDING_NOT_SET,
        PADDING_VALID,
        PADDING_SAME_BEGIN,
        PADDING_SAME_END,
    } padding_type_t;

    template <typename T>
    class Tensor
    {
    public:
        T *element;
        int exponent;
        std::vector<int> shape;

        Tensor();
        Tensor<T> &set_exponent(const int exponent);
        Tensor<T> &set_shape(const std::vector<int> shape);
        int get_size();
        bool malloc_element(const bool auto_free = true);
        void free_element();
        bool is_same_shape(Tensor<T> &input);
    };

    template <typename T>
    class Constant
    {
    public:
        const T *element;
        const int exponent;
        const std::vector<int> shape;

        Constant(const T *element, const int exponent, const std::vector<int> shape);
    };

    template <typename T>
    class Filter : public Constant<T>
    {
    public:
        const std::vector<int> dilation;
        std::vector<int> shape_with_dilation;
        const int8_t *channel_exponent;
        const int channel_exponent_size;

        Filter(const T *element, const int exponent, const std::vector<int> shape, const std::vector<int> dilation = {1, 1});
        Filter(const T *element, const int8_t *channel_exponent, const int channel_exponent_size, const std::vector<int> shape,
               const std::vector<int> dilation = {1, 1});
    };

    template <typename T>
    class Bias : public Constant<T>
    {
    public:
        using Constant<T>::Constant;
    };

    template <typename T>
    class Activation : public Constant<T>
    {
    public:
        const activation_type_t type;

        Activation(const activation_type_t type, const T *element = NULL, const int exponent = 0, const std::vector<int> shape = {0});
    };

    namespace layer
    {
        class Layer
        {
        public:
            char *name;

            Layer(const char *name = NULL);
            ~Layer();
            Layer(const Layer &) = delete;
            Layer &operator=(const Layer &) = delete;
        };

        template <typename feature_t>
        class Model
        {
        public:
            virtual ~Model() {}
            virtual void build(Tensor<feature_t> &input) = 0;
            virtual void call(Tensor<feature_t> &input) = 0;
            void forward(Tensor<feature_t> &input);
        };

        template <typename feature_t, typename bias_t = feature_t>
        class Conv2D : public Layer
        {
        public:
            Conv2D(const int output_exponent, const Filter<feature_t> *filter, const Bias<bias_t> *bias = NULL,
                   const Activation<feature_t> *activation = NULL, const padding_type_t padding_type = PADDING_VALID,
                   std::vector<int> padding = {}, const int stride_y = 1, const int stride_x = 1, const char *name = "Conv2D");
            ~Conv2D();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, bool autoload_enable = false,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t, typename bias_t = feature_t>
        class DepthwiseConv2D : public Layer
        {
        public:
            DepthwiseConv2D(const int output_exponent, const Filter<feature_t> *filter, const Bias<bias_t> *bias = NULL,
                            const Activation<feature_t> *activation = NULL, const padding_type_t padding_type = PADDING_VALID,
                            std::vector<int> padding = {}, const int stride_y = 1, const int stride_x = 1,
                            const char *name = "DepthwiseConv2D");
            ~DepthwiseConv2D();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, bool autoload_enable = false,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t, typename bias_t = feature_t>
        class FullyConnected : public Layer
        {
        public:
            FullyConnected(const int output_exponent, const Filter<feature_t> *filter, const Bias<bias_t> *bias = NULL,
                           const Activation<feature_t> *activation = NULL, const bool flatten = true,
                           const char *name = "FullyConnected");
            ~FullyConnected();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, bool autoload_enable = false,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class MaxPool2D : public Layer
        {
        public:
            MaxPool2D(const std::vector<int> filter_shape, const padding_type_t padding_type = PADDING_VALID,
                      std::vector<int> padding = {}, const int stride_y = 1, const int stride_x = 1,
                      const char *name = "MaxPool2D");
            ~MaxPool2D();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, uint8_t autoload_enable = 0);
        };

        template <typename feature_t>
        class AvgPool2D : public Layer
        {
        public:
            AvgPool2D(const int output_exponent, const std::vector<int> filter_shape,
                      const padding_type_t padding_type = PADDING_VALID, std::vector<int> padding = {},
                      const int stride_y = 1, const int stride_x = 1, const char *name = "AvgPool2D");
            ~AvgPool2D();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, uint8_t autoload_enable = 0);
        };

        template <typename feature_t>
        class GlobalAveragePool2D : public Layer
        {
        public:
            GlobalAveragePool2D(const int output_exponent, const char *name = "GlobalAveragePool2D");
            ~GlobalAveragePool2D();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, uint8_t autoload_enable = 0);
        };

        template <typename feature_t>
        class Add2D : public Layer
        {
        public:
            Add2D(const int output_exponent, const Activation<feature_t> *activation = NULL, const char *name = "Add2D",
                  bool inplace = false);
            ~Add2D();
            void build(Tensor<feature_t> &input0, Tensor<feature_t> &input1, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input0, Tensor<feature_t> &input1,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class Sub2D : public Layer
        {
        public:
            Sub2D(const int output_exponent, const Activation<feature_t> *activation = NULL, const char *name = "Sub2D",
                  bool inplace = false);
            ~Sub2D();
            void build(Tensor<feature_t> &input0, Tensor<feature_t> &input1, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input0, Tensor<feature_t> &input1,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class Mul2D : public Layer
        {
        public:
            Mul2D(const int output_exponent, const Activation<feature_t> *activation = NULL, const char *name = "Mul2D",
                  bool inplace = false);
            ~Mul2D();
            void build(Tensor<feature_t> &input0, Tensor<feature_t> &input1, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input0, Tensor<feature_t> &input1,
                                    const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class Relu : public Layer
        {
        public:
            Relu(const char *name = "Relu", bool inplace = false);
            ~Relu();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class LeakyRelu : public Layer
        {
        public:
            LeakyRelu(const int activation_alpha, const int activation_exponent, const char *name = "LeakyRelu",
                      bool inplace = false);
            ~LeakyRelu();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class PRelu : public Layer
        {
        public:
            PRelu(const feature_t *activation_element, const int activation_exponent = 0, const char *name = "PRelu",
                  bool inplace = false);
            ~PRelu();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input, const std::vector<int> &assign_core = CONFIG_DEFAULT_ASSIGN_CORE);
        };

        template <typename feature_t>
        class Flatten : public Layer
        {
        public:
            Flatten(const char *name = "Flatten", bool inplace = false);
            ~Flatten();
            void build(Tensor<feature_t> &input, bool print_shape = false);
            Tensor<feature_t> &get_output();
            Tensor<feature_t> &call(Tensor<feature_t> &input);
        };

        template <typename feature_t>
        class Concat : Layer
        {
        public:
            Concat(int axis, const char *name = "Concat");
            ~Concat();
            void build(std::vector<Tensor<feature_t> *> args, bool print_shape = false);
            Tensor<feature_t> &call(std::vector<Tensor<feature_t> *> inputs, bool free_inputs = false);
            Tensor<feature_t> &get_output();
        };
    } // namespace layer
} // namespace dl
